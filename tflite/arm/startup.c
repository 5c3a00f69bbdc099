/* Minimal Cortex-M start-up for the emulated MPS2/MPS3 boards (qemu-system-arm), our own:
 * vector table (initial stack pointer, reset, faults, SysTick), .data copy, .bss clear, FPU
 * enable when the build uses it, semihosting I/O (newlib rdimon), main(), exit code to the host.
 * syq_arm_ticks(): SysTick-based counter of processor clock ticks (24-bit counter + wrap count);
 * under qemu -icount shift=0 one instruction is 1 ns of virtual time, so instructions = ticks *
 * 1e9 / SYQ_ARM_CLOCK_HZ. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __stack_top;
extern void initialise_monitor_handles(void);
extern int main(int argc, char **argv);

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define CPACR (*(volatile uint32_t *)0xE000ED88u)

static volatile uint32_t systick_wraps;

void _init(void);
void _fini(void);
void _init(void) {} /* newlib exit() calls them (-nostartfiles: no crti/crtn) */
void _fini(void) {}

void SysTick_Handler(void) { ++systick_wraps; }

uint64_t syq_arm_ticks(void) {
    uint32_t w, v;
    do { /* consistent pair: no wrap between the two reads */
        w = systick_wraps;
        v = SYST_CVR;
    } while (w != systick_wraps);
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - v);
}

static void fault(void) {
    printf("FAULT\n");
    exit(3);
}

void Reset_Handler(void) {
    uint32_t *s = &__data_load, *d = &__data_start;
    while (d < &__data_end) *d++ = *s++;
    for (d = &__bss_start; d < &__bss_end;) *d++ = 0;
#if defined(__ARM_FP) || defined(__ARM_FEATURE_MVE)
    CPACR |= 0xFu << 20; /* CP10, CP11 full access (FPU, Helium) */
    __asm__ volatile("dsb\n isb" ::: "memory");
#endif
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* processor clock, interrupt on wrap, enable */
    initialise_monitor_handles();
    {
#ifdef SYQ_ARM_ARG /* one command-line argument, fixed at build time */
        static char a0[] = "fw", a1[] = SYQ_ARM_ARG;
        static char *argv[] = {a0, a1, 0};
        exit(main(2, argv));
#else
        static char a0[] = "fw";
        static char *argv[] = {a0, 0};
        exit(main(1, argv));
#endif
    }
}

typedef void (*syq_vector)(void);
__attribute__((section(".vectors"), used)) const syq_vector syq_vector_table[16] = {
    (syq_vector)(uintptr_t)&__stack_top, Reset_Handler, fault, fault, fault, fault, fault, 0, 0, 0, 0,
    fault, fault, 0, fault, SysTick_Handler};
