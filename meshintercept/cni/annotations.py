"""Per-pod settings from pod annotations, in the names users already have on their pods.

A pod's annotation replaces the CNI config's value of that setting (as Istio's annotations
replace its mesh-wide values); several annotations naming the same setting must agree, and
lists are taken whole: nothing is silently truncated or dropped (osm-edge keeps 20 entries
and drops the rest; a backend that cannot hold a list refuses it at enable, with the count).
A value we cannot honour fails the pod's ADD with a sentence naming the annotation, because
guessing would intercept the pod differently from what its owner wrote.

Accepted, per setting (first the project's own ``meshintercept.io/`` names):

| setting | annotations |
|---|---|
| exclude_outbound_ports | meshintercept.io/exclude-outbound-ports, openservicemesh.io/outbound-port-exclusion-list, traffic.sidecar.istio.io/excludeOutboundPorts, traffic.kuma.io/exclude-outbound-ports |
| exclude_inbound_ports | meshintercept.io/exclude-inbound-ports, openservicemesh.io/inbound-port-exclusion-list, traffic.sidecar.istio.io/excludeInboundPorts, traffic.kuma.io/exclude-inbound-ports |
| include_inbound_ports | meshintercept.io/include-inbound-ports, openservicemesh.io/inbound-port-inclusion-list, traffic.sidecar.istio.io/includeInboundPorts (``*`` = every port) |
| exclude_outbound_cidrs | meshintercept.io/exclude-outbound-cidrs, openservicemesh.io/outbound-ip-range-exclusion-list, traffic.sidecar.istio.io/excludeOutboundIPRanges, traffic.kuma.io/exclude-outbound-ips |
| outbound_port, inbound_port, proxy_uid, families | meshintercept.io/outbound-port, meshintercept.io/inbound-port, meshintercept.io/proxy-uid, meshintercept.io/families |
| capture_dns, dns_port | meshintercept.io/capture-dns ("true"/"false"), meshintercept.io/dns-port |
| mode | meshintercept.io/mode |

Outbound inclusion lists (Istio ``includeOutboundPorts``/``includeOutboundIPRanges``, osm
``outbound-port-inclusion-list``/``outbound-ip-range-inclusion-list``) are refused unless they
say "everything" (``*``, or empty): every backend intercepts all outbound traffic but exclusions.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Dict, List, Optional, Tuple

from meshintercept import registry
from meshintercept.errors import MeshInterceptError
from meshintercept.spec import InterceptSpec, split_list

OWN = "meshintercept.io/"
OSM = "openservicemesh.io/"
ISTIO = "traffic.sidecar.istio.io/"
KUMA = "traffic.kuma.io/"

#: annotation -> the spec field (or "mode") it sets
SETTINGS: Dict[str, str] = {
    OWN + "exclude-outbound-ports": "exclude_outbound_ports",
    OSM + "outbound-port-exclusion-list": "exclude_outbound_ports",
    ISTIO + "excludeOutboundPorts": "exclude_outbound_ports",
    KUMA + "exclude-outbound-ports": "exclude_outbound_ports",
    OWN + "exclude-inbound-ports": "exclude_inbound_ports",
    OSM + "inbound-port-exclusion-list": "exclude_inbound_ports",
    ISTIO + "excludeInboundPorts": "exclude_inbound_ports",
    KUMA + "exclude-inbound-ports": "exclude_inbound_ports",
    OWN + "include-inbound-ports": "include_inbound_ports",
    OSM + "inbound-port-inclusion-list": "include_inbound_ports",
    ISTIO + "includeInboundPorts": "include_inbound_ports",
    OWN + "exclude-outbound-cidrs": "exclude_outbound_cidrs",
    OSM + "outbound-ip-range-exclusion-list": "exclude_outbound_cidrs",
    ISTIO + "excludeOutboundIPRanges": "exclude_outbound_cidrs",
    KUMA + "exclude-outbound-ips": "exclude_outbound_cidrs",
    OWN + "outbound-port": "outbound_port",
    OWN + "inbound-port": "inbound_port",
    OWN + "proxy-uid": "proxy_uid",
    OWN + "families": "families",
    OWN + "capture-dns": "capture_dns",
    OWN + "dns-port": "dns_port",
    OWN + "mode": "mode",
}
#: Outbound inclusion lists: only "everything" can be honoured.
EVERYTHING_ONLY = (ISTIO + "includeOutboundPorts", ISTIO + "includeOutboundIPRanges",
                   OSM + "outbound-port-inclusion-list", OSM + "outbound-ip-range-inclusion-list")
LISTS = {"exclude_outbound_ports", "exclude_inbound_ports", "include_inbound_ports", "exclude_outbound_cidrs",
         "families"}


class AnnotationError(MeshInterceptError):
    """A pod annotation that cannot be honoured; the message names it."""


def _value(field: str, text: str):
    if field in LISTS:
        values = split_list(text)
        return [] if values == ["*"] and field == "include_inbound_ports" else values
    return text.strip()


def settings(pod: dict) -> Tuple[Dict[str, object], Dict[str, str]]:
    """The pod's settings by field, and the annotation each came from; raises AnnotationError."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    values: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    for key in sorted(annotations, key=lambda k: (not k.startswith(OWN), k)):
        text = str(annotations[key])
        if key in EVERYTHING_ONLY:
            if split_list(text) not in ([], ["*"]):
                raise AnnotationError(
                    f"pod annotation {key}={text!r} asks to intercept only some outbound traffic; meshintercept "
                    "intercepts all outbound traffic except exclusions: use an exclusion annotation instead.")
            continue
        field = SETTINGS.get(key)
        if field is None:
            continue
        value = _value(field, text)
        if field in values and _canonical(field, values[field]) != _canonical(field, value):
            raise AnnotationError(f"pod annotations {sources[field]} and {key} disagree about {field} "
                                  f"({values[field]!r} vs {value!r}); keep one of them.")
        values.setdefault(field, value)
        sources.setdefault(field, f"annotation {key}")
    return values, sources


def _canonical(field: str, value) -> object:
    """Two spellings of one value compare equal ("22,80" and "80, 22")."""
    if field == "mode":
        return value
    try:
        return InterceptSpec.build(**{field: value}).to_dict()[field]
    except MeshInterceptError:
        return value


def apply(pod: Optional[dict], spec: InterceptSpec, mode: str) -> Tuple[InterceptSpec, str, Dict[str, str]]:
    """The spec and mode for this pod: the CNI config's, with its annotations' settings in place;
    and where each non-default setting came from."""
    config = spec.to_dict()
    default = InterceptSpec().to_dict()
    sources = {f.name: "CNI config" for f in fields(InterceptSpec) if config[f.name] != default[f.name]}
    if pod is None:
        return spec, mode, sources
    values, from_annotations = settings(pod)
    new_mode = str(values.pop("mode", mode))
    if new_mode != mode:
        try:
            registry.load(new_mode)
        except MeshInterceptError:
            raise AnnotationError(f"pod annotation {from_annotations['mode']} names mode {new_mode!r}, which this "
                                  f"node does not have; available modes: {', '.join(registry.names())}.") from None
    for field, value in values.items():  # each one alone first: the error names its annotation
        try:
            InterceptSpec.build(**{field: value})
        except MeshInterceptError as exc:
            raise AnnotationError(f"pod {from_annotations[field]}: {exc.message}") from None
    try:
        new_spec = InterceptSpec.build(**{**config, **values})
    except MeshInterceptError as exc:
        where = ", ".join(from_annotations[f] for f in values)
        raise AnnotationError(f"pod {where} with the CNI config: {exc.message}") from None
    return new_spec, new_mode, {**sources, **from_annotations}


def explain(sources: Dict[str, str]) -> List[str]:
    """Lines for status: which setting came from where."""
    return [f"{field} from {where}" for field, where in sorted(sources.items())]
