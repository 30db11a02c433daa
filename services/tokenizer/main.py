"""Wiring of lmesh-tokenizer: flags, the tokenizer cache under the data directory, the servicer."""

from __future__ import annotations

import argparse

from services.common.config import add_env_argument, float_type, int_type
from services.common.server import ServiceParts, ServiceRuntime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_env_argument(parser, "--resolve-ttl", "LMESH_RESOLVE_TTL_S", "5",
                     "seconds a model reference's resolution is reused (alias moves show after this)",
                     type=float_type(0))
    add_env_argument(parser, "--max-models", "LMESH_TOKENIZER_MAX_MODELS", "8",
                     "model versions whose tokenizers are kept loaded, ≥ 1", type=int_type(1))


def extra_config(args: argparse.Namespace) -> dict[str, str]:
    return {"resolve_ttl_s": str(args.resolve_ttl), "max_models": str(args.max_models)}


def build(runtime: ServiceRuntime) -> ServiceParts:
    # Imported here: the CLI imports every main.py to build its parser; tokenizers and jinja2 are heavy.
    from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    from services.common.peers import REGISTRY
    from services.tokenizer.loader import RegistrySource, TokenizerCache
    from services.tokenizer.servicer import TokenizerServicer

    extra = runtime.config.extra
    cache = TokenizerCache(
        RegistrySource(runtime.mesh.peer(REGISTRY)),
        runtime.config.data_dir / "artifacts",
        resolve_ttl_s=float(extra.get("resolve_ttl_s", "5")),
        max_models=int(extra.get("max_models", "8")),
    )
    name = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
    # Twice the gateway's 4 MiB chat requests: the rendered conversation plus its framing always fits.
    return ServiceParts(servicers=[(tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
                                    TokenizerServicer(cache), name)], max_request_bytes=8 * 1024 * 1024)
