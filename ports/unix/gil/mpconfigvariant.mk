# The unix port with the interpreter lock on (see mpconfigvariant.h);
# ports/unix/build.sh passes the frozen manifest.
