"""The built-in digits model: a tiny Stable Diffusion of coloured handwritten digits, and its digit oracle.

data.py makes the images and captions on the fly (scikit-learn's real handwriting plus DejaVu fonts);
train.py trains the VAE, the text encoder (contrastively) and the UNet; oracle.py trains and exports the
digit/colour classifier the tests judge images with; evaluate.py measures the model with the oracle.
"""
