"""A KubeVirt simulator that speaks the Kubernetes REST protocol over HTTP.

It plays the API server (storage, resourceVersions, watch, discovery, OpenAPI, tables) and
KubeVirt's controllers (admission, VMI lifecycle, scheduling, deletion) so that labvirt and
real clients such as kubectl and the official Python client can run against it unmodified.
"""
