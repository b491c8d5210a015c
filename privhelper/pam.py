"""ctypes libpam binding: account, setcred and session, never authentication (Globus Auth
did that; python-pam can only authenticate). The conversation answers no prompts."""

import ctypes

PAM_SUCCESS = 0
PAM_CONV_ERR = 19
PAM_ESTABLISH_CRED, PAM_DELETE_CRED = 0x2, 0x4  # pam_setcred flags
PAM_ERROR_MSG, PAM_TEXT_INFO = 3, 4  # the message styles the conversation accepts
_NAMES = ("SUCCESS OPEN_ERR SYMBOL_ERR SERVICE_ERR SYSTEM_ERR BUF_ERR PERM_DENIED AUTH_ERR CRED_INSUFFICIENT "  # Linux-PAM's
          "AUTHINFO_UNAVAIL USER_UNKNOWN MAXTRIES NEW_AUTHTOK_REQD ACCT_EXPIRED SESSION_ERR CRED_UNAVAIL CRED_EXPIRED "
          "CRED_ERR NO_MODULE_DATA CONV_ERR AUTHTOK_ERR AUTHTOK_RECOVERY_ERR AUTHTOK_LOCK_BUSY AUTHTOK_DISABLE_AGING "
          "TRY_AGAIN IGNORE ABORT AUTHTOK_EXPIRED MODULE_UNKNOWN BAD_ITEM CONV_AGAIN INCOMPLETE").split()


def _code(rc: int) -> str:
    """As upstream writes it: `error code: 7 [PAM_AUTH_ERR]`."""
    return f"error code: {rc}" + (f" [PAM_{_NAMES[rc]}]" if 0 <= rc < len(_NAMES) else "")

_libpam = ctypes.CDLL("libpam.so.0", use_errno=True)
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.calloc.argtypes, _libc.calloc.restype = [ctypes.c_size_t, ctypes.c_size_t], ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_char_p), ("resp_retcode", ctypes.c_int)]


_CONV_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Message)),
                              ctypes.POINTER(ctypes.POINTER(_Response)), ctypes.c_void_p)


class _Conv(ctypes.Structure):
    _fields_ = [("conv", _CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


_libpam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Conv), ctypes.POINTER(ctypes.c_void_p)]
for _f in (_libpam.pam_acct_mgmt, _libpam.pam_setcred, _libpam.pam_open_session, _libpam.pam_close_session, _libpam.pam_end):
    _f.argtypes, _f.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
_libpam.pam_strerror.argtypes, _libpam.pam_strerror.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_char_p
_libpam.pam_getenvlist.argtypes, _libpam.pam_getenvlist.restype = [ctypes.c_void_p], ctypes.POINTER(ctypes.c_void_p)


class PamError(Exception):
    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step


class PamTransaction:
    """One PAM transaction for one user, used only inside a session process."""

    def __init__(self, service: str, user: str):
        self.messages = []
        self._conv = _Conv(_CONV_FUNC(self._converse), None)  # kept referenced: PAM calls it later
        self._handle, self._last, self.session_open, self.cred_set = ctypes.c_void_p(), PAM_SUCCESS, False, False
        rc = _libpam.pam_start(service.encode(), user.encode(), ctypes.byref(self._conv), ctypes.byref(self._handle))
        if rc != PAM_SUCCESS:
            raise PamError("pam_start", f"({_code(rc)})")

    def _converse(self, num_msg, msgs, resp, _appdata):
        for i in range(num_msg):
            style, text = msgs[i].contents.msg_style, msgs[i].contents.msg
            if style not in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                return PAM_CONV_ERR  # a prompt: nobody is there to answer it
            if text:
                self.messages.append(text.decode("utf-8", "replace").strip())
        block = _libc.calloc(num_msg, ctypes.sizeof(_Response))
        if not block:
            return PAM_CONV_ERR
        resp[0] = ctypes.cast(block, ctypes.POINTER(_Response))
        return PAM_SUCCESS

    def _call(self, step: str, flags: int = 0) -> None:
        self._last = rc = getattr(_libpam, step)(self._handle, flags)
        if rc != PAM_SUCCESS:
            text = _libpam.pam_strerror(self._handle, rc).decode("utf-8", "replace")
            said = f" (module said: {'; '.join(self.messages)})" if self.messages else ""
            raise PamError(step, f"({_code(rc)}) {text}{said}")

    def open(self) -> None:
        """Account check, credentials, session: the order su and sshd use."""
        self._call("pam_acct_mgmt")
        self._call("pam_setcred", PAM_ESTABLISH_CRED)
        self.cred_set = True
        self._call("pam_open_session")
        self.session_open = True

    def environment(self) -> dict:
        """pam_getenvlist(): the variables PAM modules set (pam_env, pam_systemd...)."""
        env, lst, i = {}, _libpam.pam_getenvlist(self._handle), 0
        while lst and lst[i]:
            name, sep, value = ctypes.string_at(lst[i]).decode("utf-8", "replace").partition("=")
            if sep:
                env[name] = value
            _libc.free(lst[i])
            i += 1
        if lst:
            _libc.free(ctypes.cast(lst, ctypes.c_void_p))
        return env

    def close(self) -> None:
        """Close what was opened, in reverse; always end the transaction. Raises the first error."""
        try:
            if self.session_open:
                self.session_open = False
                self._call("pam_close_session")
        finally:
            try:
                if self.cred_set:
                    self.cred_set = False
                    self._call("pam_setcred", PAM_DELETE_CRED)
            finally:
                _libpam.pam_end(self._handle, self._last)
