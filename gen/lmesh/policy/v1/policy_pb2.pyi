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
    __slots__ = ("api_key", "client_certificate", "model", "resolved_model", "resolved_aliases", "prompt_tokens", "max_tokens", "reservation_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_ALIASES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    client_certificate: ClientCertificate
    model: str
    resolved_model: str
    resolved_aliases: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: int
    max_tokens: int
    reservation_id: str
    def __init__(self, api_key: _Optional[str] = ..., client_certificate: _Optional[_Union[ClientCertificate, _Mapping]] = ..., model: _Optional[str] = ..., resolved_model: _Optional[str] = ..., resolved_aliases: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("principal", "reservation_id", "reserved_tokens", "lease_ms", "limits", "tenant_limits", "metered")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TENANT_LIMITS_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    reservation_id: str
    reserved_tokens: int
    lease_ms: int
    limits: Limits
    tenant_limits: Limits
    metered: bool
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ..., reservation_id: _Optional[str] = ..., reserved_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., tenant_limits: _Optional[_Union[Limits, _Mapping]] = ..., metered: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("key_id", "limits")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    limits: LimitsUpdate
    def __init__(self, key_id: _Optional[str] = ..., limits: _Optional[_Union[LimitsUpdate, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("key_id", "tenant", "allowed_models", "display_name", "create_time_unix_ms", "revoked", "client_cert_subject", "client_cert_sha256", "limits")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    create_time_unix_ms: int
    revoked: bool
    client_cert_subject: str
    client_cert_sha256: str
    limits: Limits
    def __init__(self, key_id: _Optional[str] = ..., tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., create_time_unix_ms: _Optional[int] = ..., revoked: _Optional[bool] = ..., client_cert_subject: _Optional[str] = ..., client_cert_sha256: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "allowed_models", "display_name", "client_cert_subject", "client_cert_sha256", "limits")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    client_cert_subject: str
    client_cert_sha256: str
    limits: Limits
    def __init__(self, tenant: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., client_cert_subject: _Optional[str] = ..., client_cert_sha256: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

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
