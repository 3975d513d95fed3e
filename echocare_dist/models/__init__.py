"""echocare_dist.models"""
