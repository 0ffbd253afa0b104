// A bare-metal arm64 guest with MTE for the kvm backend (see docs/LAB.md).
//
// Entry at the start of guest RAM, EL1h, DAIF masked, MMU off, with:
//   x0 heap base (page aligned; the tag record is the 64 KiB below it)
//   x1 objects in the heap (one 4 KiB page each, at most 65536)
//   x2 operations per second (0: flat out), paced by the virtual counter
//   x3 mode: 0 allocator (free = retag, allocate = data stores),
//            1 retag churn (tags only), 2 idle (self-checks only)
//   x4 operations between self-checks
//   x5 seed (random object choice, RGSR_EL1)
// It maps RAM Normal Tagged, tags every object with IRG + ST2G, then
// loops: pick an object, give it a fresh random tag (never 0, never its
// old one), store data through the tagged pointer (allocator), record the
// tag.  Every x4 operations it re-reads every granule's tag with LDG,
// compares with the record and reports through MMIO writes (below).
// Exceptions report ESR/ELR and stop.

        .equ MMIO,           0x0a000000
        .equ REP_MISMATCHES, 0x00   // the write that completes a report
        .equ REP_GRANULES,   0x08
        .equ REP_OPS,        0x10
        .equ REP_FAULT_ESR,  0x18
        .equ REP_FAULT_ELR,  0x20

        .text
        .global _start
_start:
        mov     x19, x0                 // heap
        mov     x20, x1                 // objects
        mov     x21, x2                 // ops per second
        mov     x22, x3                 // mode
        mov     x23, x4                 // ops between checks
        mov     x24, x5                 // random state
        sub     x25, x19, #0x10000      // tag record, one byte an object
        movz    x26, #(MMIO >> 16), lsl #16
        adr     x9, vectors
        msr     vbar_el1, x9
        adr     x9, l1_table            // 1 GiB blocks: device below RAM, RAM tagged
        mov     x10, #0x405             // AF, AttrIndx 1, block
        str     x10, [x9]
        ldr     x10, =0x40000701        // AF, inner shareable, AttrIndx 0, block
        str     x10, [x9, #8]
        msr     ttbr0_el1, x9
        mov     x10, #0xf0              // attr0 Normal Tagged WB, attr1 Device-nGnRnE
        msr     mair_el1, x10
        ldr     x10, =0x2200803519      // T0SZ 25, WBWA, inner shareable, EPD1, IPS 40 bits, TBI0
        msr     tcr_el1, x10
        ldr     x10, =0x10001           // GCR_EL1: RRND, exclude tag 0
        msr     s3_0_c1_c0_6, x10
        msr     s3_0_c1_c0_5, x24       // RGSR_EL1
        isb
        tlbi    vmalle1
        dsb     nsh
        isb
        ldr     x10, =(0x30d01805 | (1 << 43))  // M, C, I, ATA; no tag checks
        msr     sctlr_el1, x10
        isb
        mov     x28, #0                 // counter ticks between ops
        cbz     x21, 1f
        mrs     x9, cntfrq_el0
        udiv    x28, x9, x21
1:      mrs     x27, cntvct_el0         // the next op's deadline
        mov     x15, #0                 // ops done
        mov     x6, #0
2:      mov     x0, x6                  // tag every object once
        bl      retag
        add     x6, x6, #1
        cmp     x6, x20
        b.lo    2b
        bl      check
        mov     x7, #0                  // ops since the last check
loop:
        cmp     x22, #2
        b.eq    3f
        ldr     x9, =6364136223846793005
        ldr     x10, =1442695040888963407
        madd    x24, x24, x9, x10
        lsr     x0, x24, #33
        udiv    x11, x0, x20
        msub    x0, x11, x20, x0        // object = random % objects
        bl      retag
3:      add     x15, x15, #1
        add     x7, x7, #1
        cmp     x7, x23
        b.lo    4f
        bl      check
        mov     x7, #0
4:      cbz     x28, loop
        mrs     x9, cntvct_el0          // deadline = max(deadline, now) + ticks
        cmp     x27, x9
        csel    x27, x9, x27, lo
        add     x27, x27, x28
5:      mrs     x9, cntvct_el0
        cmp     x9, x27
        b.lo    5b
        b       loop

// retag(x0 = object): a fresh tag for its page, data stores, the record
retag:
        add     x9, x19, x0, lsl #12
        ldrb    w10, [x25, x0]
        mov     x11, #1
        lsl     x11, x11, x10           // exclude the old tag as well
        irg     x9, x9, x11
        mov     x12, #128
        mov     x13, x9
6:      st2g    x13, [x13], #32
        subs    x12, x12, #1
        b.ne    6b
        ubfx    x10, x9, #56, #4
        cbnz    x22, 7f                 // retag churn: tags only
        str     x15, [x9]               // the new object's data
        str     x24, [x9, #8]
        str     x0, [x9, #2048]
7:      strb    w10, [x25, x0]
        ret

// check: LDG every granule of every object against the record; report
check:
        mov     x0, #0
        mov     x1, #0                  // mismatches
        mov     x2, #0                  // granules checked
8:      add     x9, x19, x0, lsl #12
        ldrb    w10, [x25, x0]
        mov     x12, #256
9:      mov     x13, x9
        ldg     x13, [x9]
        ubfx    x14, x13, #56, #4
        cmp     x14, x10
        cinc    x1, x1, ne
        add     x9, x9, #16
        subs    x12, x12, #1
        b.ne    9b
        add     x2, x2, #256
        add     x0, x0, #1
        cmp     x0, x20
        b.lo    8b
        str     x15, [x26, #REP_OPS]
        str     x2, [x26, #REP_GRANULES]
        str     x1, [x26, #REP_MISMATCHES]
        ret

fault:
        movz    x26, #(MMIO >> 16), lsl #16
        mrs     x9, esr_el1
        mrs     x10, elr_el1
        str     x10, [x26, #REP_FAULT_ELR]
        str     x9, [x26, #REP_FAULT_ESR]
10:     wfi
        b       10b

        .ltorg
        .balign 2048
vectors:
        .rept   16
        b       fault
        .balign 128
        .endr

        .balign 4096
l1_table:
        .fill   512, 8, 0
