"""The microvm's ACPI Generic Event Device, driven through its MMIO region as Linux's evged and ACPICA do."""
from __future__ import annotations

from pyhv.arch.x86.acpi.builder import (
    GED_EVENT, GED_RESET, GED_SLEEP_CONTROL, GED_SLEEP_STATUS, GED_SIZE, SLEEP_STATUS_WAK_STS,
)
from pyhv.devices.acpi_ged import AcpiGed
from pyhv.devices.irq import CallbackIrqLine

BASE = 0xFEA00000


def make():
    levels: list[bool] = []
    events: list[str] = []
    irq = CallbackIrqLine(levels.append)
    ged = AcpiGed("ged", BASE, irq, on_poweroff=lambda: events.append("poweroff"),
                  on_reset=lambda: events.append("reset"))
    (claim,) = ged.claims()
    assert claim.space == "memory" and claim.address == BASE and claim.region.size == GED_SIZE
    return ged, claim.region, levels, events


def test_power_button_raises_an_edge_and_the_event_reads_once():
    ged, region, levels, _ = make()
    assert region.read(GED_EVENT, 1) == 0
    ged.press_power_button()
    assert levels == [True, False]                 # one edge on the GSI (declared edge in the DSDT)
    assert region.read(GED_EVENT, 1) == 1          # _EVT: power button
    assert region.read(GED_EVENT, 1) == 0          # read clears
    region.write(GED_EVENT, 1, 0xFF)               # writes do nothing
    assert region.read(GED_EVENT, 1) == 0 and ged.state.presses == 1


def test_s5_with_slp_en_powers_off_other_sleep_types_do_not():
    ged, region, _, events = make()
    region.write(GED_SLEEP_CONTROL, 1, 5 << 2)               # SLP_TYP 5 without SLP_EN: only latched
    assert events == [] and region.read(GED_SLEEP_CONTROL, 1) == 5 << 2
    region.write(GED_SLEEP_CONTROL, 1, (3 << 2) | (1 << 5))  # S3: not supported, ignored
    assert events == []
    region.write(GED_SLEEP_CONTROL, 1, 0x34)                 # what Linux writes for S5
    assert events == ["poweroff"]


def test_reset_register_needs_the_fadt_reset_value():
    ged, region, _, events = make()
    region.write(GED_RESET, 1, 0x41)
    assert events == []
    region.write(GED_RESET, 1, 0x42)
    assert events == ["reset"] and region.read(GED_RESET, 1) == 0


def test_wak_sts_is_write_one_to_clear_and_reset_clears_pending_events():
    ged, region, _, _ = make()
    ged.state.sleep_status = SLEEP_STATUS_WAK_STS
    region.write(GED_SLEEP_STATUS, 1, 0)
    assert region.read(GED_SLEEP_STATUS, 1) == SLEEP_STATUS_WAK_STS
    region.write(GED_SLEEP_STATUS, 1, SLEEP_STATUS_WAK_STS)
    assert region.read(GED_SLEEP_STATUS, 1) == 0
    ged.press_power_button()
    ged.reset()
    assert region.read(GED_EVENT, 1) == 0


def test_a_wide_access_reads_every_register_and_leaves_the_machine_running():
    ged, region, _, events = make()
    ged.press_power_button()
    assert region.read(0, 4) == 1                  # event byte in the low byte, nothing else set
    region.write(0, 4, 0)
    assert events == []
