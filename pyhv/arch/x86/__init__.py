"""x86 specifics: reset state, CPUID, firmware and Linux loaders, platform tables."""
