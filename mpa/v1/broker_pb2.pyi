import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_STATE_UNSPECIFIED: _ClassVar[RequestState]
    REQUEST_STATE_PENDING: _ClassVar[RequestState]
    REQUEST_STATE_APPROVED: _ClassVar[RequestState]
    REQUEST_STATE_REJECTED: _ClassVar[RequestState]
    REQUEST_STATE_CANCELLED: _ClassVar[RequestState]
    REQUEST_STATE_EXPIRED: _ClassVar[RequestState]
REQUEST_STATE_UNSPECIFIED: RequestState
REQUEST_STATE_PENDING: RequestState
REQUEST_STATE_APPROVED: RequestState
REQUEST_STATE_REJECTED: RequestState
REQUEST_STATE_CANCELLED: RequestState
REQUEST_STATE_EXPIRED: RequestState

class AwsTarget(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class KubernetesTarget(_message.Message):
    __slots__ = ("cluster", "groups")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cluster: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestCredentialsRequest(_message.Message):
    __slots__ = ("aws", "kubernetes", "reason", "incident", "duration_seconds")
    AWS_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    aws: AwsTarget
    kubernetes: KubernetesTarget
    reason: str
    incident: str
    duration_seconds: int
    def __init__(self, aws: _Optional[_Union[AwsTarget, _Mapping]] = ..., kubernetes: _Optional[_Union[KubernetesTarget, _Mapping]] = ..., reason: _Optional[str] = ..., incident: _Optional[str] = ..., duration_seconds: _Optional[int] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("approver", "at", "comment")
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    approver: str
    at: _timestamp_pb2.Timestamp
    comment: str
    def __init__(self, approver: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., comment: _Optional[str] = ...) -> None: ...

class CredentialRequest(_message.Message):
    __slots__ = ("id", "requester", "aws", "kubernetes", "reason", "incident", "state", "mode", "approvals", "created_at", "expires_at", "valid_until", "duration_seconds", "closed_by", "close_reason", "fetches", "routing")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    AWS_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    FETCHES_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    id: str
    requester: str
    aws: AwsTarget
    kubernetes: KubernetesTarget
    reason: str
    incident: str
    state: RequestState
    mode: str
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    valid_until: _timestamp_pb2.Timestamp
    duration_seconds: int
    closed_by: str
    close_reason: str
    fetches: int
    routing: Routing
    def __init__(self, id: _Optional[str] = ..., requester: _Optional[str] = ..., aws: _Optional[_Union[AwsTarget, _Mapping]] = ..., kubernetes: _Optional[_Union[KubernetesTarget, _Mapping]] = ..., reason: _Optional[str] = ..., incident: _Optional[str] = ..., state: _Optional[_Union[RequestState, str]] = ..., mode: _Optional[str] = ..., approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_seconds: _Optional[int] = ..., closed_by: _Optional[str] = ..., close_reason: _Optional[str] = ..., fetches: _Optional[int] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("eligible_approvers", "required_approvals")
    ELIGIBLE_APPROVERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    eligible_approvers: _containers.RepeatedScalarFieldContainer[str]
    required_approvals: int
    def __init__(self, eligible_approvers: _Optional[_Iterable[str]] = ..., required_approvals: _Optional[int] = ...) -> None: ...

class ReviewRequest(_message.Message):
    __slots__ = ("id", "verdict", "comment")
    class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERDICT_UNSPECIFIED: _ClassVar[ReviewRequest.Verdict]
        VERDICT_APPROVE: _ClassVar[ReviewRequest.Verdict]
        VERDICT_REJECT: _ClassVar[ReviewRequest.Verdict]
    VERDICT_UNSPECIFIED: ReviewRequest.Verdict
    VERDICT_APPROVE: ReviewRequest.Verdict
    VERDICT_REJECT: ReviewRequest.Verdict
    ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    verdict: ReviewRequest.Verdict
    comment: str
    def __init__(self, id: _Optional[str] = ..., verdict: _Optional[_Union[ReviewRequest.Verdict, str]] = ..., comment: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class AwsCredentials(_message.Message):
    __slots__ = ("access_key_id", "secret_access_key", "session_token", "expiration", "role_arn", "region")
    ACCESS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_ACCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    ROLE_ARN_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: _timestamp_pb2.Timestamp
    role_arn: str
    region: str
    def __init__(self, access_key_id: _Optional[str] = ..., secret_access_key: _Optional[str] = ..., session_token: _Optional[str] = ..., expiration: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., role_arn: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class KubernetesCredentials(_message.Message):
    __slots__ = ("token", "expiration", "cluster", "server")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    token: str
    expiration: _timestamp_pb2.Timestamp
    cluster: str
    server: str
    def __init__(self, token: _Optional[str] = ..., expiration: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cluster: _Optional[str] = ..., server: _Optional[str] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("aws", "kubernetes")
    AWS_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    aws: AwsCredentials
    kubernetes: KubernetesCredentials
    def __init__(self, aws: _Optional[_Union[AwsCredentials, _Mapping]] = ..., kubernetes: _Optional[_Union[KubernetesCredentials, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("mine", "reviewable", "states", "limit")
    MINE_FIELD_NUMBER: _ClassVar[int]
    REVIEWABLE_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    mine: bool
    reviewable: bool
    states: _containers.RepeatedScalarFieldContainer[RequestState]
    limit: int
    def __init__(self, mine: _Optional[bool] = ..., reviewable: _Optional[bool] = ..., states: _Optional[_Iterable[_Union[RequestState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[CredentialRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[CredentialRequest, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
