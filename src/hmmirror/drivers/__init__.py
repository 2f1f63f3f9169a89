"""Device drivers (drivers/): ``nvdimm/pmem.py`` (pmem namespaces), ``dax/device.py`` (device-dax),
``pfnmap.py`` (a ``remap_pfn_range`` / ``vm_insert_page`` driver) and the mirroring device."""
