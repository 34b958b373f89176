/* The codec's compiled paths (_speedups_codec.c), registered by _speedups.c. */
#ifndef SHMCACHE_SPEEDUPS_CODEC_H
#define SHMCACHE_SPEEDUPS_CODEC_H

#include <Python.h>

/* plain_tree and rebuild, added to the module's functions at import. */
extern PyMethodDef speedups_codec_methods[];

/* Look up what the codec functions use (object.__new__, interned names); -1: error. */
int speedups_codec_init(void);

#endif
