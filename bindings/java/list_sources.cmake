# cmake -DDIR=<dir> -DOUT=<file> -P list_sources.cmake: writes the .java files SWIG generated
# in DIR into OUT, one per line, as a javac @file (their names depend on the header).
file(GLOB_RECURSE _sources ${DIR}/*.java)
list(SORT _sources)
list(JOIN _sources "\n" _text)
file(WRITE ${OUT} "${_text}\n")
