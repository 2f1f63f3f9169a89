"""DAX drivers (drivers/dax): device-dax character devices."""
