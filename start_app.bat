@echo off
rem Start the Image-to-Video app on Windows: double-click this file, or run it from cmd or
rem PowerShell with the same flags as start_app.py (start_app.bat --help lists them).
rem It only finds Python and hands over to start_app.py, which does the real work.
rem Keep it CRLF (see .gitattributes), without a BOM, and free of bash-isms: cmd.exe reads it line
rem by line. Non-ASCII text only after "chcp 65001", which makes cmd read the rest as UTF-8.
setlocal
cd /d "%~dp0"
rem UTF-8 console, so the Chinese messages of start_app.py and the app show correctly.
chcp 65001 >nul 2>&1

rem Prefer the project's own environment, then the py launcher, then python on PATH.
if exist ".venv\Scripts\python.exe" goto use_venv
rem "if not errorlevel 1" rather than "&& goto": Wine's cmd takes the "&&" branch even after a failure.
where py >nul 2>&1
if not errorlevel 1 goto use_py
where python >nul 2>&1
if not errorlevel 1 goto use_python
goto no_python

:use_venv
".venv\Scripts\python.exe" start_app.py %*
set "I2V_RC=%ERRORLEVEL%"
goto finished

:use_py
py -3 start_app.py %*
set "I2V_RC=%ERRORLEVEL%"
goto finished

:use_python
python start_app.py %*
set "I2V_RC=%ERRORLEVEL%"
rem 9009 means "not found": the Microsoft Store's python alias answered instead of a real Python.
if "%I2V_RC%"=="9009" goto no_python
goto finished

:no_python
echo.
echo [ERROR] Python 3.10 or newer was not found.
echo         Install it from https://www.python.org/downloads/windows/ (tick "Add python.exe to PATH"),
echo         or run: winget install Python.Python.3.12
echo         then double-click start_app.bat again.
echo [ERROR] 未找到 Python 3.10+。请从 python.org 安装 (勾选 "Add python.exe to PATH") 后重新运行。
set "I2V_RC=10"
goto failed

:finished
if "%I2V_RC%"=="0" goto end
rem 130 is Ctrl+C: the user stopped the app on purpose, so there is nothing to read.
if "%I2V_RC%"=="130" goto end
echo.
echo [ERROR] start_app.py stopped with exit code %I2V_RC%. Read the messages above.
echo         Check this PC with: start_app.bat --diagnose
echo         If the .venv folder is broken, delete it and run start_app.bat again.

:failed
echo.
pause

:end
endlocal & exit /b %I2V_RC%
