"""echocare_dist.finetune"""
