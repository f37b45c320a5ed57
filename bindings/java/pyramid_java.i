/* The raw Java layer, generated into package io.pyramid: Capi (the functions, package-
 * private), CapiJNI (the natives), the params proxies EngineParams and SessionParams (public:
 * Model and Session hand them to the caller's configure lambda) and the enums. The public
 * API is Model, Session and PyramidException over them. */
%module Capi

%include <enums.swg>
%javaconst(1);
%javaconst(0) PYR_SEED_RANDOM;  /* its value is UINT64_MAX, not a Java literal */

/* ---- names Java programmers expect ------------------------------------------------------ */
%rename(Status) pyr_status;
%rename(LogLevel) pyr_log_level;
%rename(KvWhen) pyr_kv_when;
%rename(EngineParams) pyr_engine_params;
%rename(SessionParams) pyr_session_params;
%rename(EngineOut) pyr_engine_out;
%rename(SessionOut) pyr_session_out;
%rename(Int32Array) pyr_int32_array;
%rename("%(strip:[PYR_])s", %$isenumitem) "";            /* Status.ERR_IO */
%rename("%(lowercamelcase)s", %$ismember, %$isvariable) ""; /* kv_policy -> setKvPolicy */

/* ---- what stays inside the package ------------------------------------------------------ */
%pragma(java) moduleclassmodifiers="final class"
%pragma(java) jniclassclassmodifiers="final class"
%pragma(java) jniclasscode=%{
  static {
    NativeLoader.load();
  }
%}
%typemap(javaclassmodifiers) SWIGTYPE *, pyr_engine_out, pyr_session_out, pyr_int32_array
  "final class"

/* ---- sizes and counters: uint64_t as Java long (byte counts fit; the seed wraps, so
 * PYR_SEED_RANDOM is -1L) rather than BigInteger --------------------------------------- */
%apply long long { uint64_t };

/* ---- strings cross JNI as UTF-8 byte arrays ----------------------------------------------
 * JNI's own string functions (NewStringUTF, GetStringUTFChars) use "modified UTF-8", which
 * splits characters outside the BMP (emoji) into surrogate halves. The Java side encodes and
 * decodes with StandardCharsets.UTF_8 (Utf8.java) and C sees the exact bytes. */
%typemap(jni) const char* "jbyteArray"
%typemap(jtype) const char* "byte[]"
%typemap(jstype) const char* "String"
%typemap(javain) const char* "Utf8.encode($javainput)"
%typemap(javaout) const char* {
    return Utf8.decode($jnicall);
  }
%typemap(in) const char* {
  $1 = NULL;
  if ($input) {
    jsize n = JCALL1(GetArrayLength, jenv, $input);
    char* bytes = (char*)malloc((size_t)n + 1);
    if (!bytes) {
      SWIG_JavaThrowException(jenv, SWIG_JavaOutOfMemoryError, "pyramid: out of memory");
      return $null;
    }
    JCALL4(GetByteArrayRegion, jenv, $input, 0, n, (jbyte*)bytes);
    bytes[n] = '\0';
    $1 = bytes;
  }
}
%typemap(freearg) const char* "free((char*)$1);"
%typemap(out) const char* {
  $result = NULL;
  if ($1) {
    jsize n = (jsize)strlen($1);
    $result = JCALL1(NewByteArray, jenv, n);
    if ($result) JCALL4(SetByteArrayRegion, jenv, $result, 0, n, (const jbyte*)$1);
  }
}

%include "../pyramid.i"
