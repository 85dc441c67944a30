"""trp.heads"""
