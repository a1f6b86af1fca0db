# placeholder until the extension module lands (helper is writing the real one)
def is_available(): return False
def unavailable_reason(): return "not built"
def built_with_cuda(): return False
def library_path(): return None
