"""echocare_dist.data"""
