"""trp.vrt"""
