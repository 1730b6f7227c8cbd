// Keeps the native libraries loadable with the libstdc++ of torch's own platform (manylinux_2_28,
// GCC 8's libstdc++: symbol versions up to GLIBCXX_3.4.25).
//
// The stable-ABI headers build their error messages in default-constructed std::ostringstream /
// std::stringstream objects (STD_TORCH_CHECK, TORCH_ERROR_CODE_CHECK).  libstdc++ exports those
// default constructors only from GLIBCXX_3.4.26 (GCC 9) on, so referencing them would make the
// wheel need glibc 2.34's platform.  These hidden definitions, under the same symbol names, take the
// references instead and do what the library's do: construct through the openmode constructors
// (exported since GLIBCXX_3.4.21) with the default modes.  They are local to each library.
#include <new>
#include <sstream>

extern "C" {

__attribute__((visibility("hidden"))) void mmk_ostringstream_default_ctor(std::ostringstream* self) __asm__(
    "_ZNSt7__cxx1119basic_ostringstreamIcSt11char_traitsIcESaIcEEC1Ev");
__attribute__((visibility("hidden"))) void mmk_stringstream_default_ctor(std::stringstream* self) __asm__(
    "_ZNSt7__cxx1118basic_stringstreamIcSt11char_traitsIcESaIcEEC1Ev");

void mmk_ostringstream_default_ctor(std::ostringstream* self) {
  ::new (self) std::ostringstream(std::ios_base::out);
}

void mmk_stringstream_default_ctor(std::stringstream* self) {
  ::new (self) std::stringstream(std::ios_base::out | std::ios_base::in);
}

}  // extern "C"
