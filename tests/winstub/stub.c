/* Stand-in for python.exe / py.exe in the start_app.bat tests (built with x86_64-w64-mingw32-gcc).
 *
 * Appends one line per call to the file named by STUB_LOG, as UTF-8, tab-separated:
 *   <this exe's name> \t <current directory> \t <arg1> \t <arg2> ...
 * and exits with the code in STUB_EXIT (0 when unset). The wide-char API keeps spaces and
 * non-ASCII characters in paths and arguments intact, which is what the tests check.
 */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <wchar.h>

static void put_utf8(FILE *f, const wchar_t *text)
{
    int n = WideCharToMultiByte(CP_UTF8, 0, text, -1, NULL, 0, NULL, NULL);
    char *buf = (char *)malloc(n > 0 ? n : 1);
    if (!buf)
        return;
    if (n <= 0 || !WideCharToMultiByte(CP_UTF8, 0, text, -1, buf, n, NULL, NULL))
        buf[0] = '\0';
    fputs(buf, f);
    free(buf);
}

int wmain(int argc, wchar_t **argv)
{
    wchar_t module[MAX_PATH * 4], cwd[MAX_PATH * 4];
    const wchar_t *log = _wgetenv(L"STUB_LOG");
    const wchar_t *code = _wgetenv(L"STUB_EXIT");
    const wchar_t *name;

    GetModuleFileNameW(NULL, module, sizeof module / sizeof module[0]);
    name = wcsrchr(module, L'\\') ? wcsrchr(module, L'\\') + 1 : module;
    GetCurrentDirectoryW(sizeof cwd / sizeof cwd[0], cwd);

    if (log && *log) {
        FILE *f = _wfopen(log, L"ab");
        if (f) {
            put_utf8(f, name);
            fputc('\t', f);
            put_utf8(f, cwd);
            for (int i = 1; i < argc; i++) {
                fputc('\t', f);
                put_utf8(f, argv[i]);
            }
            fputc('\n', f);
            fclose(f);
        }
    }
    printf("stub %ls ran\n", name);
    if (code && *code && wcstol(code, NULL, 10) != 0) {
        fprintf(stderr, "stub %ls: failing with exit code %ls\n", name, code);
        return (int)wcstol(code, NULL, 10);
    }
    return 0;
}
