/* EL0 tag access for the prot-mte strategy on the kvm backend: one LDG or
 * STG per 16-byte granule through a PROT_MTE mapping of guest RAM.  Python
 * cannot emit these instructions; it loads this library with ctypes.
 * Tags travel one per byte (low nibble), as KVM_ARM_MTE_COPY_TAGS's buffer. */
#include <stddef.h>
#include <stdint.h>

#define GRANULE 16
#define TAG_SHIFT 56

/* tags[i] = allocation tag of granule i at addr (LDG); returns granules read */
size_t mte_load_tags(const void *addr, size_t granules, uint8_t *tags)
{
    uintptr_t p = (uintptr_t)addr & ~((uintptr_t)0xf << TAG_SHIFT);
    for (size_t i = 0; i < granules; i++, p += GRANULE) {
        uintptr_t t = p;
        __asm__ volatile("ldg %0, [%1]" : "+r"(t) : "r"(p) : "memory");
        tags[i] = (t >> TAG_SHIFT) & 0xf;
    }
    return granules;
}

/* allocation tag of granule i at addr = tags[i] (STG); returns granules stored */
size_t mte_store_tags(void *addr, size_t granules, const uint8_t *tags)
{
    uintptr_t p = (uintptr_t)addr & ~((uintptr_t)0xf << TAG_SHIFT);
    for (size_t i = 0; i < granules; i++, p += GRANULE) {
        uintptr_t t = p | ((uintptr_t)(tags[i] & 0xf) << TAG_SHIFT);
        __asm__ volatile("stg %0, [%0]" : : "r"(t) : "memory");
    }
    return granules;
}
