/* The floor of any LD_PRELOAD approach, for `experiments reuse` (config `empty-preload`):
 * a shared object that does nothing. Built with -nostdlib, so it has no constructor, no
 * destructor, no .init/.fini and no DT_NEEDED entry: what a process pays for it is the
 * dynamic loader opening, mapping and relocating one more object, and nothing else. */
const char warmpool_empty_preload[] = "warmpool empty preload";
