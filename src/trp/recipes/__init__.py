"""trp.recipes"""
