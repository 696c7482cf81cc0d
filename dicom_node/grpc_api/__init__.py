"""The path API over gRPC (README "gRPC"): ``path_inference.proto`` and the code
generated from it (``path_inference_pb2.py``, ``path_inference_pb2_grpc.py``; never
edited by hand, regenerated with the command at the top of the .proto), and
``server.py``, the service on top of ``dicom_node.path_requests``.

Importing this package imports nothing; ``dicom_node.service`` imports ``server`` only
when ``grpc.enabled`` is set.
"""
