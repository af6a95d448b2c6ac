"""Which frozen ImageNet CNN turns an image into a feature vector, and how are its weights read?"""
