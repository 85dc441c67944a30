"""trp.models"""
