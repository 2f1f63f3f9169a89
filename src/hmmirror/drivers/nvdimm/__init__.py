"""NVDIMM drivers (drivers/nvdimm): pmem namespaces."""
