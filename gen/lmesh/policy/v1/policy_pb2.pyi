from lmesh.common.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Detector(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DETECTOR_UNSPECIFIED: _ClassVar[Detector]
    DETECTOR_DENY: _ClassVar[Detector]
    DETECTOR_EMAIL: _ClassVar[Detector]
    DETECTOR_PHONE: _ClassVar[Detector]
    DETECTOR_CARD: _ClassVar[Detector]
    DETECTOR_IBAN: _ClassVar[Detector]
    DETECTOR_IPV4: _ClassVar[Detector]
    DETECTOR_SECRET: _ClassVar[Detector]

class RuleAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RULE_ACTION_UNSPECIFIED: _ClassVar[RuleAction]
    RULE_ACTION_BLOCK: _ClassVar[RuleAction]
    RULE_ACTION_REDACT: _ClassVar[RuleAction]
    RULE_ACTION_FLAG: _ClassVar[RuleAction]

class ScreeningStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCREENING_STAGE_UNSPECIFIED: _ClassVar[ScreeningStage]
    SCREENING_STAGE_INPUT: _ClassVar[ScreeningStage]
    SCREENING_STAGE_OUTPUT: _ClassVar[ScreeningStage]
DETECTOR_UNSPECIFIED: Detector
DETECTOR_DENY: Detector
DETECTOR_EMAIL: Detector
DETECTOR_PHONE: Detector
DETECTOR_CARD: Detector
DETECTOR_IBAN: Detector
DETECTOR_IPV4: Detector
DETECTOR_SECRET: Detector
RULE_ACTION_UNSPECIFIED: RuleAction
RULE_ACTION_BLOCK: RuleAction
RULE_ACTION_REDACT: RuleAction
RULE_ACTION_FLAG: RuleAction
SCREENING_STAGE_UNSPECIFIED: ScreeningStage
SCREENING_STAGE_INPUT: ScreeningStage
SCREENING_STAGE_OUTPUT: ScreeningStage

class Principal(_message.Message):
    __slots__ = ("key_id", "tenant", "allowed_models")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_tokens_per_request", "requests_per_minute", "tokens_per_minute")
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    max_tokens_per_request: int
    requests_per_minute: int
    tokens_per_minute: int
    def __init__(self, max_tokens_per_request: _Optional[int] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ...) -> None: ...

class ClientCertificate(_message.Message):
    __slots__ = ("subject", "sha256_fingerprint")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    subject: str
    sha256_fingerprint: str
    def __init__(self, subject: _Optional[str] = ..., sha256_fingerprint: _Optional[str] = ...) -> None: ...

class AuthenticateRequest(_message.Message):
    __slots__ = ("api_key", "client_certificate")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    client_certificate: ClientCertificate
    def __init__(self, api_key: _Optional[str] = ..., client_certificate: _Optional[_Union[ClientCertificate, _Mapping]] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("api_key", "client_certificate", "model", "input_tokens", "max_tokens", "resolved_model", "resolved_aliases")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_ALIASES_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    client_certificate: ClientCertificate
    model: str
    input_tokens: int
    max_tokens: int
    resolved_model: str
    resolved_aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, api_key: _Optional[str] = ..., client_certificate: _Optional[_Union[ClientCertificate, _Mapping]] = ..., model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., resolved_model: _Optional[str] = ..., resolved_aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("principal", "limits")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    limits: Limits
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "tenant", "allowed_models", "display_name", "create_time_unix_ms", "revoked", "client_cert_subject", "client_cert_sha256")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    create_time_unix_ms: int
    revoked: bool
    client_cert_subject: str
    client_cert_sha256: str
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., create_time_unix_ms: _Optional[int] = ..., revoked: _Optional[bool] = ..., client_cert_subject: _Optional[str] = ..., client_cert_sha256: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "allowed_models", "display_name", "client_cert_subject", "client_cert_sha256")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    client_cert_subject: str
    client_cert_sha256: str
    def __init__(self, tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., client_cert_subject: _Optional[str] = ..., client_cert_sha256: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    api_key: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class WatchRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuardrailRule(_message.Message):
    __slots__ = ("id", "detect", "action", "stages", "tenants", "models", "phrases", "patterns", "replacement")
    ID_FIELD_NUMBER: _ClassVar[int]
    DETECT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    detect: Detector
    action: RuleAction
    stages: _containers.RepeatedScalarFieldContainer[ScreeningStage]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    phrases: _containers.RepeatedScalarFieldContainer[str]
    patterns: _containers.RepeatedScalarFieldContainer[str]
    replacement: str
    def __init__(self, id: _Optional[str] = ..., detect: _Optional[_Union[Detector, str]] = ..., action: _Optional[_Union[RuleAction, str]] = ..., stages: _Optional[_Iterable[_Union[ScreeningStage, str]]] = ..., tenants: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., phrases: _Optional[_Iterable[str]] = ..., patterns: _Optional[_Iterable[str]] = ..., replacement: _Optional[str] = ...) -> None: ...

class RuleSet(_message.Message):
    __slots__ = ("version", "rules", "source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    rules: _containers.RepeatedCompositeFieldContainer[GuardrailRule]
    source: str
    def __init__(self, version: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[GuardrailRule, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class ScreeningFinding(_message.Message):
    __slots__ = ("rule_id", "action", "stage", "message_index", "start", "end")
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    rule_id: str
    action: RuleAction
    stage: ScreeningStage
    message_index: int
    start: int
    end: int
    def __init__(self, rule_id: _Optional[str] = ..., action: _Optional[_Union[RuleAction, str]] = ..., stage: _Optional[_Union[ScreeningStage, str]] = ..., message_index: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class RecordScreeningRequest(_message.Message):
    __slots__ = ("request_id", "key_id", "tenant", "model", "rules_version", "findings", "blocked", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    key_id: str
    tenant: str
    model: str
    rules_version: str
    findings: _containers.RepeatedCompositeFieldContainer[ScreeningFinding]
    blocked: bool
    usage: _generation_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., rules_version: _Optional[str] = ..., findings: _Optional[_Iterable[_Union[ScreeningFinding, _Mapping]]] = ..., blocked: _Optional[bool] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ...) -> None: ...

class RecordScreeningResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
