"""echocare-dist: distributed pretraining of EchoCare ultrasound foundation models."""
__version__ = "0.1.0"
