"""echocare_dist.synth"""
