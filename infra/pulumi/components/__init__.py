"""Pulumi components for Metaflow Stack services; each installs the service's chart from infra/helm."""
