from lmesh.common.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_PERIOD_UNSPECIFIED: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_NONE: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_DAY: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_MONTH: _ClassVar[BudgetPeriod]

class ReservationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVATION_STATE_UNSPECIFIED: _ClassVar[ReservationState]
    RESERVATION_STATE_OPEN: _ClassVar[ReservationState]
    RESERVATION_STATE_SETTLED: _ClassVar[ReservationState]
    RESERVATION_STATE_EXPIRED: _ClassVar[ReservationState]

class Ending(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDING_UNSPECIFIED: _ClassVar[Ending]
    ENDING_FINISHED: _ClassVar[Ending]
    ENDING_CANCELLED: _ClassVar[Ending]
    ENDING_CLIENT_GONE: _ClassVar[Ending]
    ENDING_DEADLINE: _ClassVar[Ending]
    ENDING_ERROR: _ClassVar[Ending]

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
BUDGET_PERIOD_UNSPECIFIED: BudgetPeriod
BUDGET_PERIOD_NONE: BudgetPeriod
BUDGET_PERIOD_DAY: BudgetPeriod
BUDGET_PERIOD_MONTH: BudgetPeriod
RESERVATION_STATE_UNSPECIFIED: ReservationState
RESERVATION_STATE_OPEN: ReservationState
RESERVATION_STATE_SETTLED: ReservationState
RESERVATION_STATE_EXPIRED: ReservationState
ENDING_UNSPECIFIED: Ending
ENDING_FINISHED: Ending
ENDING_CANCELLED: Ending
ENDING_CLIENT_GONE: Ending
ENDING_DEADLINE: Ending
ENDING_ERROR: Ending
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
    __slots__ = ("key_id", "tenant", "allowed_models", "max_priority", "allowed_tools")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    max_priority: int
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., max_priority: _Optional[int] = ..., allowed_tools: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "budget_tokens", "budget_period")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    budget_tokens: int
    budget_period: BudgetPeriod
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., budget_period: _Optional[_Union[BudgetPeriod, str]] = ...) -> None: ...

class LimitsUpdate(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "budget_tokens", "budget_period")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    budget_tokens: int
    budget_period: BudgetPeriod
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., budget_period: _Optional[_Union[BudgetPeriod, str]] = ...) -> None: ...

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
    __slots__ = ("principal", "limits", "tenant_limits")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TENANT_LIMITS_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    limits: Limits
    tenant_limits: Limits
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., tenant_limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("api_key", "client_certificate", "model", "resolved_model", "resolved_aliases", "prompt_tokens", "max_tokens", "reservation_id", "continues")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_ALIASES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUES_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    client_certificate: ClientCertificate
    model: str
    resolved_model: str
    resolved_aliases: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: int
    max_tokens: int
    reservation_id: str
    continues: str
    def __init__(self, api_key: _Optional[str] = ..., client_certificate: _Optional[_Union[ClientCertificate, _Mapping]] = ..., model: _Optional[str] = ..., resolved_model: _Optional[str] = ..., resolved_aliases: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., reservation_id: _Optional[str] = ..., continues: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("principal", "reservation_id", "reserved_tokens", "lease_ms", "limits", "tenant_limits", "metered", "key_window")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TENANT_LIMITS_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    KEY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    reservation_id: str
    reserved_tokens: int
    lease_ms: int
    limits: Limits
    tenant_limits: Limits
    metered: bool
    key_window: RateWindow
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ..., reservation_id: _Optional[str] = ..., reserved_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., tenant_limits: _Optional[_Union[Limits, _Mapping]] = ..., metered: _Optional[bool] = ..., key_window: _Optional[_Union[RateWindow, _Mapping]] = ...) -> None: ...

class RateWindow(_message.Message):
    __slots__ = ("requests", "tokens", "oldest_leaves_in_ms")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_LEAVES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    tokens: int
    oldest_leaves_in_ms: int
    def __init__(self, requests: _Optional[int] = ..., tokens: _Optional[int] = ..., oldest_leaves_in_ms: _Optional[int] = ...) -> None: ...

class RenewReservationRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class RenewReservationResponse(_message.Message):
    __slots__ = ("state", "lease_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    state: ReservationState
    lease_ms: int
    def __init__(self, state: _Optional[_Union[ReservationState, str]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("reservation_id", "prompt_tokens", "completion_tokens", "ending")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    prompt_tokens: int
    completion_tokens: int
    ending: Ending
    def __init__(self, reservation_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ending: _Optional[_Union[Ending, str]] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("charged_tokens", "reserved_tokens", "previous_state")
    CHARGED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    charged_tokens: int
    reserved_tokens: int
    previous_state: ReservationState
    def __init__(self, charged_tokens: _Optional[int] = ..., reserved_tokens: _Optional[int] = ..., previous_state: _Optional[_Union[ReservationState, str]] = ...) -> None: ...

class UpdateApiKeyRequest(_message.Message):
    __slots__ = ("key_id", "limits", "max_priority", "tools")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    limits: LimitsUpdate
    max_priority: int
    tools: ToolGrant
    def __init__(self, key_id: _Optional[str] = ..., limits: _Optional[_Union[LimitsUpdate, _Mapping]] = ..., max_priority: _Optional[int] = ..., tools: _Optional[_Union[ToolGrant, _Mapping]] = ...) -> None: ...

class ToolGrant(_message.Message):
    __slots__ = ("allowed_tools",)
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allowed_tools: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class SetTenantLimitsRequest(_message.Message):
    __slots__ = ("tenant", "limits")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limits: LimitsUpdate
    def __init__(self, tenant: _Optional[str] = ..., limits: _Optional[_Union[LimitsUpdate, _Mapping]] = ...) -> None: ...

class SetTenantLimitsResponse(_message.Message):
    __slots__ = ("tenant", "limits")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limits: Limits
    def __init__(self, tenant: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class PeriodUsage(_message.Message):
    __slots__ = ("period", "label", "spent_tokens", "reserved_tokens", "remaining_tokens", "end_unix_ms")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SPENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    period: BudgetPeriod
    label: str
    spent_tokens: int
    reserved_tokens: int
    remaining_tokens: int
    end_unix_ms: int
    def __init__(self, period: _Optional[_Union[BudgetPeriod, str]] = ..., label: _Optional[str] = ..., spent_tokens: _Optional[int] = ..., reserved_tokens: _Optional[int] = ..., remaining_tokens: _Optional[int] = ..., end_unix_ms: _Optional[int] = ...) -> None: ...

class SubjectUsage(_message.Message):
    __slots__ = ("subject", "tenant", "key_id", "limits", "periods", "requests_in_window", "tokens_in_window")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PERIODS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    subject: str
    tenant: str
    key_id: str
    limits: Limits
    periods: _containers.RepeatedCompositeFieldContainer[PeriodUsage]
    requests_in_window: int
    tokens_in_window: int
    def __init__(self, subject: _Optional[str] = ..., tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., periods: _Optional[_Iterable[_Union[PeriodUsage, _Mapping]]] = ..., requests_in_window: _Optional[int] = ..., tokens_in_window: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("usage", "next_page_token")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    usage: _containers.RepeatedCompositeFieldContainer[SubjectUsage]
    next_page_token: str
    def __init__(self, usage: _Optional[_Iterable[_Union[SubjectUsage, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "tenant", "allowed_models", "display_name", "create_time_unix_ms", "revoked", "client_cert_subject", "client_cert_sha256", "limits", "max_priority", "allowed_tools")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    create_time_unix_ms: int
    revoked: bool
    client_cert_subject: str
    client_cert_sha256: str
    limits: Limits
    max_priority: int
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., create_time_unix_ms: _Optional[int] = ..., revoked: _Optional[bool] = ..., client_cert_subject: _Optional[str] = ..., client_cert_sha256: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., max_priority: _Optional[int] = ..., allowed_tools: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "allowed_models", "display_name", "client_cert_subject", "client_cert_sha256", "limits", "max_priority", "allowed_tools")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    client_cert_subject: str
    client_cert_sha256: str
    limits: Limits
    max_priority: int
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., client_cert_subject: _Optional[str] = ..., client_cert_sha256: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., max_priority: _Optional[int] = ..., allowed_tools: _Optional[_Iterable[str]] = ...) -> None: ...

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

class AuditRecord(_message.Message):
    __slots__ = ("seq", "time_unix_ms", "action", "outcome", "principal", "tenant", "model", "rule_id", "tokens", "trace_id", "detail", "prev_hash", "hash")
    class TokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix_ms: int
    action: str
    outcome: str
    principal: str
    tenant: str
    model: str
    rule_id: str
    tokens: _containers.ScalarMap[str, int]
    trace_id: str
    detail: str
    prev_hash: str
    hash: str
    def __init__(self, seq: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., action: _Optional[str] = ..., outcome: _Optional[str] = ..., principal: _Optional[str] = ..., tenant: _Optional[str] = ..., model: _Optional[str] = ..., rule_id: _Optional[str] = ..., tokens: _Optional[_Mapping[str, int]] = ..., trace_id: _Optional[str] = ..., detail: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class AuditFilter(_message.Message):
    __slots__ = ("action", "principal", "tenant")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    action: str
    principal: str
    tenant: str
    def __init__(self, action: _Optional[str] = ..., principal: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class TailAuditRequest(_message.Message):
    __slots__ = ("limit", "filter")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    filter: AuditFilter
    def __init__(self, limit: _Optional[int] = ..., filter: _Optional[_Union[AuditFilter, _Mapping]] = ...) -> None: ...

class TailAuditResponse(_message.Message):
    __slots__ = ("records", "head_seq")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    head_seq: int
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., head_seq: _Optional[int] = ...) -> None: ...

class FollowAuditRequest(_message.Message):
    __slots__ = ("backlog", "filter")
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    backlog: int
    filter: AuditFilter
    def __init__(self, backlog: _Optional[int] = ..., filter: _Optional[_Union[AuditFilter, _Mapping]] = ...) -> None: ...

class FollowAuditResponse(_message.Message):
    __slots__ = ("records", "head_seq")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    head_seq: int
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., head_seq: _Optional[int] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("ok", "records", "first_seq", "last_seq", "head_hash", "problem", "note")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    records: int
    first_seq: int
    last_seq: int
    head_hash: str
    problem: AuditProblem
    note: str
    def __init__(self, ok: _Optional[bool] = ..., records: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., head_hash: _Optional[str] = ..., problem: _Optional[_Union[AuditProblem, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class AuditProblem(_message.Message):
    __slots__ = ("seq", "kind", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[AuditProblem.Kind]
        KIND_EDITED: _ClassVar[AuditProblem.Kind]
        KIND_MISSING: _ClassVar[AuditProblem.Kind]
        KIND_REORDERED: _ClassVar[AuditProblem.Kind]
        KIND_REWRITTEN: _ClassVar[AuditProblem.Kind]
        KIND_MALFORMED: _ClassVar[AuditProblem.Kind]
        KIND_TRUNCATED: _ClassVar[AuditProblem.Kind]
    KIND_UNSPECIFIED: AuditProblem.Kind
    KIND_EDITED: AuditProblem.Kind
    KIND_MISSING: AuditProblem.Kind
    KIND_REORDERED: AuditProblem.Kind
    KIND_REWRITTEN: AuditProblem.Kind
    KIND_MALFORMED: AuditProblem.Kind
    KIND_TRUNCATED: AuditProblem.Kind
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: AuditProblem.Kind
    message: str
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[AuditProblem.Kind, str]] = ..., message: _Optional[str] = ...) -> None: ...

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
