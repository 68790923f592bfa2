/* Test-only LD_PRELOAD shim for the sanitizer build (ADADIFF_SANITIZE=ON).
 *
 * OpenVINO's TBB dlopen()s libtbbbind with RTLD_DEEPBIND, which AddressSanitizer refuses and
 * aborts on (google/sanitizers#611). This shim drops that one flag and forwards to the next
 * dlopen (ASan's interceptor), so the OpenVINO engine can run under ASan+UBSan. Preload it
 * before libasan with ASAN_OPTIONS=verify_asan_link_order=0; it defines no allocator symbols,
 * so ASan still intercepts malloc/free. */
#define _GNU_SOURCE
#include <dlfcn.h>

void* dlopen(const char* file, int mode) {
  static void* (*next)(const char*, int) = 0;
  if (!next) next = (void* (*)(const char*, int))dlsym(RTLD_NEXT, "dlopen");
  return next(file, mode & ~RTLD_DEEPBIND);
}
