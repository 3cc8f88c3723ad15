"""Triton Inference Server: what a model file describes (``model``), the repository writer
(``repository``), the config and README templates, and the client example it ships (``client``)."""
