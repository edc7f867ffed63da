"""JSON Schemas for the custom resources in deploy/k8s, which kubernetes-validate cannot
know: KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's PodMonitor
and ServiceMonitor.

Written by hand from the fields of the upstream CRDs (KEDA 2.12+, which added
scalingModifiers; prometheus-operator monitoring.coreos.com/v1) and closed with
additionalProperties: false, so a misspelt or misplaced field fails instead of being
dropped silently by the API server. Only the fields ttspool uses, or that sit next to
them, are listed. Embedded core types (ObjectMeta, LabelSelector, HPA behavior) point at
kubernetes-validate's own definitions of them.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
from referencing import Registry, Resource

K8S_VERSION = "1.37.0"
_DEFS = "/api/_definitions.json#/$defs/"


def _core(name: str) -> dict[str, Any]:
    return {"$ref": _DEFS + name}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}

_AUTH_REF = _closed({"name": _STRING, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}, ("name",))

_TRIGGER = _closed(
    {
        "type": _STRING,
        # scalingModifiers' formula refers to triggers by this name.
        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "metadata": _STRING_MAP,
        "authenticationRef": _AUTH_REF,
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
    },
    ("type", "metadata"),
)

_SCALED_OBJECT_SPEC = _closed(
    {
        "scaleTargetRef": _closed(
            {"apiVersion": _STRING, "kind": _STRING, "name": _STRING, "envSourceContainerName": _STRING},
            ("name",),
        ),
        "pollingInterval": _INT,
        "initialCooldownPeriod": _INT,
        "cooldownPeriod": _INT,
        "idleReplicaCount": _INT,
        "minReplicaCount": _INT,
        "maxReplicaCount": _INT,
        "fallback": _closed({"failureThreshold": _INT, "replicas": _INT, "behavior": _STRING}, ("failureThreshold", "replicas")),
        "advanced": _closed(
            {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": _closed(
                    {"name": _STRING, "behavior": _core("io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior")}
                ),
                "scalingModifiers": _closed(
                    {
                        "formula": _STRING,
                        "target": _STRING,
                        "activationTarget": _STRING,
                        "metricType": {"enum": ["AverageValue", "Value"]},
                    },
                    ("formula", "target"),
                ),
            }
        ),
        "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
    },
    ("scaleTargetRef", "triggers"),
)

_SECRET_TARGET_REF = _closed({"parameter": _STRING, "name": _STRING, "key": _STRING}, ("parameter", "name", "key"))

_TRIGGER_AUTH_SPEC = _closed(
    {
        "secretTargetRef": {"type": "array", "items": _SECRET_TARGET_REF},
        "env": {"type": "array", "items": _closed({"parameter": _STRING, "name": _STRING, "containerName": _STRING}, ("parameter", "name"))},
    }
)

_ENDPOINT_COMMON = {
    "port": _STRING,
    "path": _STRING,
    "scheme": {"enum": ["http", "https"]},
    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
    "scrapeTimeout": _STRING,
    "honorLabels": {"type": "boolean"},
}

_POD_MONITOR_SPEC = _closed(
    {
        "selector": _core("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
        "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STRING}}),
        "jobLabel": _STRING,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _closed(_ENDPOINT_COMMON)},
    },
    ("selector",),
)

_SERVICE_MONITOR_SPEC = _closed(
    {
        "selector": _core("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
        "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STRING}}),
        "jobLabel": _STRING,
        "endpoints": {"type": "array", "minItems": 1, "items": _closed(_ENDPOINT_COMMON)},
    },
    ("selector", "endpoints"),
)


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    schema = _closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _core("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )
    # kubernetes-validate's $refs are relative to this base.
    return {"$id": f"https://kubernetes.io/api/{kind.lower()}/{api_version}", **schema}


SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _resource("keda.sh/v1alpha1", "ScaledObject", _SCALED_OBJECT_SPEC),
    "TriggerAuthentication": _resource("keda.sh/v1alpha1", "TriggerAuthentication", _TRIGGER_AUTH_SPEC),
    "PodMonitor": _resource("monitoring.coreos.com/v1", "PodMonitor", _POD_MONITOR_SPEC),
    "ServiceMonitor": _resource("monitoring.coreos.com/v1", "ServiceMonitor", _SERVICE_MONITOR_SPEC),
}


def validate_custom(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when doc does not fit its kind's schema."""
    schema = SCHEMAS[doc["kind"]]
    defs = kv.schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(defs) @ Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)
