"""A small tritonclient wrapper, HTTP or gRPC alike: numpy arrays in, numpy arrays out.

tritonclient's HTTP client runs on gevent and must stay in the thread that made it, so a concurrent caller makes
one `Client` per thread (the load test does). A refused request raises tritonclient's
`InferenceServerException`, whose message is the server's (it names the tensor and the rule).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

PROTOCOLS = ("http", "grpc")


def parse_url(url: str, protocol: str = "") -> Tuple[str, str]:
    """'localhost:8000', 'http://host:8000' or 'grpc://host:8001' -> (protocol, 'host:port')."""
    for scheme in PROTOCOLS:
        if url.startswith(scheme + "://"):
            return scheme, url[len(scheme) + 3:].rstrip("/")
    if "://" in url:
        raise ValueError(f"--url {url}: the scheme must be http:// or grpc://")
    return protocol or "http", url.rstrip("/")


class Client:
    def __init__(self, url: str, protocol: str = "", timeout: float = 300.0) -> None:
        self.protocol, self.address = parse_url(url, protocol)
        self.timeout = timeout
        if self.protocol == "http":
            import tritonclient.http as module

            self._c = module.InferenceServerClient(self.address, connection_timeout=timeout, network_timeout=timeout)
        else:
            import tritonclient.grpc as module

            self._c = module.InferenceServerClient(self.address)
        self._m = module

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Iterable[str]) -> Dict[str, np.ndarray]:
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            t = self._m.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            tensors.append(t)
        extra = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._c.infer(model, tensors, **extra)
        return {name: result.as_numpy(name) for name in outputs}

    def input_shapes(self, model: str) -> Dict[str, List[int]]:
        """The model's inputs and their shapes without the batch dimension (from the server's metadata)."""
        meta = self._c.get_model_metadata(model, **({"as_json": True} if self.protocol == "grpc" else {}))
        return {i["name"]: [int(d) for d in i["shape"]][1:] for i in meta["inputs"]}

    def ready(self, model: str) -> bool:
        return bool(self._c.is_server_live() and self._c.is_model_ready(model))

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_) -> None:
        self.close()
