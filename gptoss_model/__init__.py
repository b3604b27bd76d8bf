"""gptoss_model"""
