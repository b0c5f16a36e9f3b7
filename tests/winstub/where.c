/* Stand-in for where.exe in the start_app.bat tests (Wine 8's where is a stub that finds nothing).
 *
 * `where NAME` succeeds when NAME is listed in STUB_WHERE_FOUND (comma-separated, e.g. "py,python")
 * and fails with exit code 1 otherwise, like the real where.exe.
 */
#include <windows.h>
#include <stdio.h>
#include <wchar.h>

int wmain(int argc, wchar_t **argv)
{
    const wchar_t *found = _wgetenv(L"STUB_WHERE_FOUND");

    if (argc < 2)
        return 2;
    if (found && *found) {
        size_t want = wcslen(argv[argc - 1]);
        for (const wchar_t *tok = found; *tok;) {
            const wchar_t *end = wcschr(tok, L',');
            size_t len = end ? (size_t)(end - tok) : wcslen(tok);
            if (len == want && _wcsnicmp(tok, argv[argc - 1], len) == 0) {
                printf("C:\\stub\\%ls.exe\n", argv[argc - 1]);
                return 0;
            }
            tok += len + (end ? 1 : 0);
        }
    }
    fprintf(stderr, "INFO: Could not find files for the given pattern(s).\n");
    return 1;
}
