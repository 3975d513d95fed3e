"""echocare_dist.curation"""
