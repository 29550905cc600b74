"""What runs beside the cloud-init test under the system python (see driver.py)."""
