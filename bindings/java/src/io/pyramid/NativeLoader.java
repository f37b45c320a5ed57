package io.pyramid;

/**
 * Loads the JNI library (libpyramid_jni, which links libpyramid) once per class loader, from
 * the system property {@code pyramid.jni.library} (an absolute path) if set, else by name
 * from {@code java.library.path}. The generated CapiJNI calls it before any native method.
 */
final class NativeLoader {
    private static boolean loaded;

    private NativeLoader() {}

    static synchronized void load() {
        if (loaded) return;
        String path = System.getProperty("pyramid.jni.library");
        if (path != null && !path.isEmpty()) {
            System.load(path);
        } else {
            System.loadLibrary("pyramid_jni");
        }
        loaded = true;
    }

    /** The binding was generated from one pyramid.h; the loaded library must have its ABI. */
    static void checkAbi() {
        int abi = Capi.pyr_abi_version();
        if (abi != CapiConstants.PYR_ABI_VERSION) {
            throw new PyramidException(Status.ERR_UNSUPPORTED,
                "the binding was generated for ABI " + CapiConstants.PYR_ABI_VERSION
                    + " but the loaded library has ABI " + abi + " (version "
                    + Capi.pyr_version_string() + "); rebuild the binding against it");
        }
    }
}
