"""echocare_dist.train"""
