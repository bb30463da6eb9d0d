"""The client side of the metadata service: the metadata provider Metaflow loads under the name ``service``."""
