# Stand-ins for what the rp2 and lwIP boards give the client's scheduled
# loop and the unix port lacks: machine.Timer(-1), which schedules its
# callback when it expires, and a socket that, like lwIP's, schedules
# callback(sock) when data arrives (socket option 20). Each uses a thread
# to notice its events, as the boards use interrupts; the client itself
# runs only on the main thread. Importing this installs `machine`.
import _thread, micropython, select, sys, time

from relay import Relay

def schedule_soon(callback, arg):
    # As an interrupt handler would: retry while the queue is full.
    while True:
        try:
            micropython.schedule(callback, arg)
            return
        except RuntimeError:
            time.sleep_ms(1)

class Timer:
    # machine.Timer(-1) as rp2's soft timers behave.
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1):
        assert id == -1, "the client asks for a virtual timer"
        self.deadline = None
        self.period = None
        self.callback = None
        # A board's timer is armed and fires atomically: without the lock,
        # init() could re-arm it between the watcher's check and its reset.
        self.lock = _thread.allocate_lock()
        _thread.start_new_thread(self._watch, ())

    def init(self, *, mode=1, period=-1, callback=None):
        assert mode in (Timer.ONE_SHOT, Timer.PERIODIC) and period > 0 and callback is not None
        with self.lock:
            self.callback = callback
            self.period = period if mode == Timer.PERIODIC else None
            self.deadline = time.ticks_add(time.ticks_ms(), period)

    def deinit(self):
        with self.lock:
            self.deadline = None

    def _watch(self):
        while True:
            with self.lock:
                expired = self.deadline is not None and time.ticks_diff(time.ticks_ms(), self.deadline) >= 0
                if expired:
                    self.deadline = None if self.period is None else time.ticks_add(self.deadline, self.period)
                    callback = self.callback
            if expired:
                schedule_soon(callback, self)
            time.sleep_ms(1)

class machine:
    Timer = Timer

sys.modules["machine"] = machine

class LwipSocket(Relay):
    # A TCP connection that, like lwIP's sockets, schedules callback(sock)
    # when data or the end of the stream arrives, once
    # setsockopt(SOL_SOCKET, 20, callback) set it.
    def __init__(self, port, signals=True):
        super().__init__(port)
        self.callback = None
        self.signals = 0
        self.open = True
        if signals:
            self.setsockopt = self._setsockopt
            _thread.start_new_thread(self._watch, ())

    def _setsockopt(self, level, option, value):
        assert option == 20, option
        self.callback = value

    def _watch(self):
        # lwIP calls back for each arrival; seen from outside, an arrival is
        # the socket turning readable (the end of the stream included).
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        was_readable = False
        while self.open:
            readable = bool(poller.poll(5))
            if readable and not was_readable and self.callback is not None:
                self.signals += 1
                schedule_soon(self.callback, self)
            was_readable = readable
            time.sleep_ms(1)

    def close(self):
        self.open = False
        self.sock.close()
