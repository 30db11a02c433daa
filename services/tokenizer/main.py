"""Wiring of lmesh-tokenizer: flags, the tokenizer cache under the data directory, the servicer."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import float_type, int_type, setting
from services.common.server import ServiceParts, ServiceRuntime


@dataclass(frozen=True)
class TokenizerSettings:
    """What `lmesh serve tokenizer` takes beyond the common settings."""

    resolve_ttl_s: float = setting(flag="--resolve-ttl", env="LMESH_RESOLVE_TTL_S", default=5.0, parse=float_type(0),
                                   help="seconds a model reference's resolution is reused (alias moves show after "
                                        "this)")
    max_models: int = setting(flag="--max-models", env="LMESH_TOKENIZER_MAX_MODELS", default=8, parse=int_type(1),
                              help="model versions whose tokenizers are kept loaded, ≥ 1")


SETTINGS = TokenizerSettings


def build(runtime: ServiceRuntime) -> ServiceParts:
    # Imported here: the CLI imports every main.py to build its parser; tokenizers and jinja2 are heavy.
    from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    from services.common.peers import REGISTRY
    from services.tokenizer.loader import RegistrySource, TokenizerCache
    from services.tokenizer.servicer import TokenizerServicer

    settings = runtime.config.settings_as(TokenizerSettings)
    cache = TokenizerCache(
        RegistrySource(runtime.mesh.peer(REGISTRY)),
        runtime.config.data_dir / "artifacts",
        resolve_ttl_s=settings.resolve_ttl_s,
        max_models=settings.max_models,
    )
    name = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
    # Twice the gateway's 4 MiB chat requests: the rendered conversation plus its framing always fits.
    return ServiceParts(servicers=[(tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
                                    TokenizerServicer(cache), name)], max_request_bytes=8 * 1024 * 1024)
