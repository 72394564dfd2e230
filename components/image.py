"""The one container image that every sfddm component runs in, built from components/Dockerfile.

Read when the components are defined, i.e. when a pipeline is compiled: `SFDDM_IMAGE=REGISTRY/sfddm:TAG
sfddm pipeline compile` points a compiled pipeline at your registry without editing code.
"""
import os

DEFAULT_IMAGE = "ghcr.io/sfddm/sfddm:0.1.0"
IMAGE = os.environ.get("SFDDM_IMAGE") or DEFAULT_IMAGE
