"""ACPI for pyhv's x86 boards: an AML encoder (`aml`), the tables (`tables`), whole table sets for pc and microvm
from an `AcpiConfig` (`builder`), and QEMU's fw_cfg linker/loader files for firmware (`table_loader`).

Direct boot:   blob, rsdp, where = builder.layout_in_memory(builder.build_tables(cfg), 0xE0000)
Firmware boot: files = table_loader.fw_cfg_files(builder.build_tables(cfg))
               (add files["etc/acpi/rsdp"], files["etc/acpi/tables"], files["etc/table-loader"] to fw_cfg)
"""
