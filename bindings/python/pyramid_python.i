/* The raw Python module pyramid.capi, under the idiomatic package in pyramid/.
 * threads="1": every wrapper releases the GIL while the C function runs, so other Python
 * threads keep running during a long prefill and session.cancel() can reach it. */
%module(package="pyramid", threads="1") capi

%include "../pyramid.i"
