"""A one-call CRI client for tests/tests/kubernetes.rs.

    cri.py SOCKET METHOD < request.json > response.json

calls `runtime.v1alpha2.RuntimeService/METHOD` (what containerd 1.6 serves)
on the unix socket SOCKET, with the request given as JSON (protobuf's JSON
mapping; map fields such as `annotations` as objects), and
prints the response as JSON. The message classes are PyPI's kubernetes-cri
(CRI before v1alpha2 was split out: the same field numbers for every field
the test uses); its generated code needs the pure-Python protobuf, and its
map fields are repeated entries there, so messages are filled and read here
field by field rather than with json_format.
"""

import json
import os
import sys

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import grpc  # noqa: E402
from kubernetes.cri import api_pb2  # noqa: E402


def is_map(field):
    return (
        field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def is_repeated(field):
    return field.is_repeated


def fill(message, value):
    """Sets `message`'s fields from the dict `value`."""
    for name, v in value.items():
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            sys.exit(f"cri.py: {message.DESCRIPTOR.name} has no field {name}")
        repeated = is_repeated(field)
        if is_map(field):
            for key, item in v.items():
                getattr(message, name).add(key=key, value=item)
        elif field.message_type is not None and repeated:
            for item in v:
                fill(getattr(message, name).add(), item)
        elif field.message_type is not None:
            fill(getattr(message, name), v)
        elif repeated:
            getattr(message, name).extend(v)
        else:
            setattr(message, name, v)


def to_dict(message):
    """The fields `message` has set, as a dict."""
    out = {}
    for field, v in message.ListFields():
        if is_map(field):
            out[field.name] = {e.key: e.value for e in v}
        elif field.message_type is not None and is_repeated(field):
            out[field.name] = [to_dict(m) for m in v]
        elif field.message_type is not None:
            out[field.name] = to_dict(v)
        elif is_repeated(field):
            out[field.name] = list(v)
        elif isinstance(v, bytes):
            out[field.name] = v.decode("utf-8", "replace")
        else:
            out[field.name] = v
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: cri.py SOCKET METHOD < request.json")
    socket, method = sys.argv[1], sys.argv[2]
    request_type = getattr(api_pb2, method + "Request", None)
    response_type = getattr(api_pb2, method + "Response", None)
    if request_type is None or response_type is None:
        sys.exit(f"cri.py: no CRI method {method}")
    request = request_type()
    fill(request, json.load(sys.stdin))
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            f"/runtime.v1alpha2.RuntimeService/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            response = call(request, timeout=120)
        except grpc.RpcError as e:
            sys.exit(f"cri.py: {method}: {e.code().name}: {e.details()}")
    print(json.dumps(to_dict(response)))


if __name__ == "__main__":
    main()
