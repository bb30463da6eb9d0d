"""Plugins Metaflow Stack adds to Metaflow.

``service`` replaces Metaflow's own service metadata provider with a subclass
that uses the service's pages, filters and run-end signal when the service
advertises them, and behaves exactly like the stock one when it does not.
"""

METADATA_PROVIDERS_DESC = [("service", "metaflow_stack.service.provider.StackServiceMetadataProvider")]
